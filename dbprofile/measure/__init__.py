"""Measurement engine: the memory tracker (bytes by category, ``tracker``), fake-tensor mode
(``fake``), device facts (CUDA allocator, NVML, environment: ``device``), the runner that
measures techniques (``runner``), the depth extrapolation of fake traces (``depth``) and
multi-device measurement (``distributed``). Import the module you need; this package imports
nothing, so importing one module stays cheap."""
