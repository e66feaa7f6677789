"""The block-wise model: a user's residual network seen as B independent denoisers.

``BlockwiseModel`` wraps any ModelSpec whose ``layers`` are residual. It cuts the L layers
into B contiguous blocks (block 0, next to the input, gets the highest noise range), wraps
every layer with AdaLN-Zero sigma conditioning (not for the denoising task, whose model is
already noise-conditioned), and adds what the task needs to cast its target as denoising.

One step on block b swaps the model's ModuleList for a ModuleList holding ONLY block b's
layers and calls the model's own forward, so the stem and head run as the user wrote them
and nothing of the other blocks runs or receives gradients. The full list is put back
afterwards (evaluation and ``state_dict`` see the whole model). Per task (details and the
reasons in docs/diffusion_blocks.md):

- classification: the clean target is the L2-normalised row of a learnable label embedding.
  Models with the readout protocol (``features(inputs, cls=...)`` and ``head``, the built-in
  ViT) are read the authors' way: c_in*z replaces the CLS token before the position
  embeddings, F is the pooled final-norm feature, D = c_out*F + c_skip*z, then a
  zero-initialised sigma-conditioned AdaLN (shift, scale) and the head give the logits.
  Other models get hooks: c_in*z at token 0 of the first active layer's input, D written
  back at token 0 of the last active layer's output, the model's own norm and head after.
- denoising: ``model(c_in*z, c_noise, labels)`` is F; D = c_skip*z + c_out*F; MSE to x0.
- causal-lm: the clean target of position i is normalize(E[y_i]) with E the model's OWN
  input embedding (no new table); n_i = c_in*z_i + c_i, where c_i is the clean stream at
  position i. Layout ``concatenated`` (default, the paper's): [c_0..c_{T-1}, n_0..n_{T-1}]
  under a modified causal mask (clean tokens causal; n_i sees c_0..c_i and itself) and
  positions [0..T-1, 0..T-1], both handed to every active layer as the keyword arguments
  ``attn_mask`` and ``positions``. Layout ``interleaved``: [c_0, n_0, c_1, n_1, ...] under
  the model's plain causal mask (no keyword arguments; flash-attention compatible). The
  hook on the last active layer returns D at the noisy positions, (N, T, d); the model's
  head gives (N, T, V) logits. Either way the active layers run on 2T tokens.
  Models that pass per-position tensors (rotary tables, 4-D masks) to their layers get them
  rebuilt for the layout by their ``position_adapter``, or are refused (sequence_layout.py).
- masked-diffusion-lm: the masking time t is partitioned instead of sigma (``masked.py``); the
  block runs on the masked tokens, its layers conditioned on t, and the model's head reads them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from dbprofile.edm import edm_preconditioning, sample_sigma
from dbprofile.methods.checkpointing import CheckpointedSegment, split_contiguous
from dbprofile.methods.diffusion_blocks.conditioning import (
    AdaLNZeroBlock,
    ConditioningContext,
    GenericAdaLNZero,
    SigmaEmbedder,
    default_cond_dim,
    modulation_of,
    wrap_layer,
    zero_linear,
)
from dbprofile.methods.diffusion_blocks.masked import block_loss, time_ranges
from dbprofile.methods.diffusion_blocks.schedule import (
    DEFAULT_GAMMA,
    WEIGHTINGS,
    block_ranges,
    default_weighting,
    weighted_loss,
)
from dbprofile.methods.diffusion_blocks.task_targets import (
    LABEL_INIT_STD,
    LM_LAYER_KWARGS,
    LM_LAYOUTS,
    accepts_keywords,
    broadcast_per_sample,
    check_batch,
    concatenated_attention_mask,
    concatenated_positions,
    find_input_embedding,
    first_output,
    has_readout,
    replace_first_output,
)
from dbprofile.seeding import seeded
from dbprofile.sequence_layout import (
    SequenceLayout,
    UnsupportedLayoutError,
    guard_rewrite,
    install_rewrite,
)
from dbprofile.spec import (
    Batch,
    LayerStack,
    ModelSpec,
    SpecError,
    get_layers,
    infer_hidden_size,
    like_stack,
    set_layers,
)


class BlockwiseModel(nn.Module):
    """A residual model prepared for DiffusionBlocks training and sampling (see module doc)."""

    input_embedding: nn.Module
    """causal-lm: the model's own token embedding (a plain attribute, not a second submodule)."""

    def __init__(
        self,
        spec: ModelSpec,
        model: nn.Module,
        blocks: int,
        *,
        gamma: float = DEFAULT_GAMMA,
        partition: str = "equiprobable",
        weighting: str | None = None,
        cond_dim: int | None = None,
        checkpoint: bool = False,
        lm_layout: str = LM_LAYOUTS[0],
        label_init_std: float = LABEL_INIT_STD,
        seed: int = 0,
    ) -> None:
        super().__init__()
        with seeded(seed):  # the added parameters are deterministic, like spec.build()
            self._setup(
                spec, model, blocks, gamma, partition, weighting, cond_dim, checkpoint, lm_layout, label_init_std
            )

    def _setup(
        self, spec, model, blocks, gamma, partition, weighting, cond_dim, checkpoint, lm_layout, label_init_std
    ) -> None:
        layers = get_layers(model, spec.layers, spec.name)
        if not isinstance(blocks, int) or blocks < 1:
            raise SpecError(f"DiffusionBlocks needs B >= 1 blocks; got B={blocks!r}. Use db:B with B >= 1.")
        if blocks > len(layers):
            raise SpecError(
                f"DiffusionBlocks with B={blocks} needs at least {blocks} layers; {spec.name!r} has "
                f"{len(layers)} in {spec.layers!r}. Use db:B with 1 <= B <= {len(layers)}."
            )
        weighting = weighting or default_weighting(spec.task)
        if weighting not in WEIGHTINGS:
            raise SpecError(f"Unknown loss weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}.")
        if lm_layout not in LM_LAYOUTS:
            raise SpecError(f"Unknown causal-lm layout {lm_layout!r}; choose one of {', '.join(LM_LAYOUTS)}.")
        if lm_layout != LM_LAYOUTS[0] and spec.task != "causal-lm":
            raise SpecError(
                f"The {lm_layout} token layout (db:B+{lm_layout}) applies to causal-lm models only; "
                f"{spec.name!r} is a {spec.task} model. Use db:B."
            )
        self.spec = spec
        self.task = spec.task
        self.num_blocks = blocks
        self.weighting = weighting
        self.partition = partition
        self.lm_layout = lm_layout
        masked = spec.task == "masked-diffusion-lm"  # ranges of the masking time t, not of sigma
        self.ranges = time_ranges(blocks, gamma) if masked else block_ranges(blocks, gamma, partition)
        self.block_layers = [list(group) for group in split_contiguous(len(layers), blocks)]
        self.model = model
        self.context = ConditioningContext()
        hidden = spec.hidden_size or infer_hidden_size(layers)
        if hidden is None and self.task != "denoising":
            raise SpecError(
                f"Cannot infer the hidden width of {spec.name!r}: its first layer has no norm weight. "
                "Set ModelSpec.hidden_size to the width of the residual stream."
            )
        self.hidden_size = hidden
        # Known for every task that reads it (the check above); None only for denoising.
        width = cast(int, hidden)
        self._layout_refusal: str | None = None
        if self.task == "denoising":
            # A denoising model is noise-conditioned by the protocol (model(x, noise_level, labels)).
            self.sigma_embedder = None
            wrapped = list(layers)
        else:
            cond_dim = cond_dim or default_cond_dim(width)
            self.sigma_embedder = SigmaEmbedder(cond_dim)
            wrapped = [wrap_layer(layer, width, cond_dim, self.context) for layer in layers]
        # Registered here as well as inside the user's model, so parameters() always sees every
        # layer, even while the user's model holds only the active block.
        self.layers = like_stack(layers, wrapped)
        set_layers(model, spec.layers, self.layers)
        self.native_readout = False
        if self.task == "classification":
            self.label_embedding = nn.Parameter(torch.randn(spec.num_classes, width) * label_init_std)
            self.native_readout = has_readout(model)
            if self.native_readout:
                # Final sigma-conditioned AdaLN (shift, scale) before the classifier; it and the
                # classifier start at zero, as in the authors' ``_init_dit``.
                self.final_modulation = zero_linear(cond_dim, 2 * width)
                nn.init.zeros_(model.head.weight)
                if model.head.bias is not None:
                    nn.init.zeros_(model.head.bias)
        elif self.task == "causal-lm":
            # Plain attribute, not a submodule: the table already belongs to the user's model.
            object.__setattr__(self, "input_embedding", find_input_embedding(model, spec))
            if lm_layout == "concatenated" and spec.position_adapter is None:
                # An adapter (HF Llama) hands the layers the layout itself; other layers must take
                # the mask as keywords. Refused per technique at its first step, not here: e2e and
                # ckpt of the same model still run.
                self._layout_refusal = self._layers_without_mask(wrapped)
        self.checkpoint = checkpoint
        # Per-layer runners (checkpointed or not), kept out of the module tree on purpose.
        self.layer_runners = [CheckpointedSegment([layer]) if checkpoint else layer for layer in wrapped]
        self._checked_layers: set[int] = set()
        self.block_residency: Callable[[int], contextlib.AbstractContextManager[object]] = contextlib.nullcontext
        """Context manager factory ``(block) -> ctx`` that makes a block's parameters resident
        for evaluation; the offloading trainer replaces it."""

    # ------------------------------------------------------------------ structure

    def _layers_without_mask(self, wrapped: list[nn.Module]) -> str | None:
        """Why the concatenated layout cannot run these layers (None: it can)."""
        for layer in wrapped:
            inner = cast(nn.Module, layer.layer)
            target = cast(nn.Module, inner.attn).forward if isinstance(layer, AdaLNZeroBlock) else inner.forward
            if not accepts_keywords(target, LM_LAYER_KWARGS):
                return (
                    f"Task 'causal-lm' of {self.spec.name!r}: the concatenated layout runs clean and noisy "
                    f"tokens side by side under a modified causal mask, which reaches each layer as the keyword "
                    f"arguments attn_mask ((2T, 2T) bool, True = may attend) and positions ((2T,) ids); "
                    f"{type(layer.layer).__name__}.forward takes neither **kwargs nor both. Accept them "
                    "(docs/diffusion_blocks.md shows how), or use lm_layout='interleaved' (the model's own "
                    "causal mask; technique db:B+interleaved)."
                )
        return None

    @property
    def extra_parameters(self) -> int:
        """Parameters DiffusionBlocks adds to the user's model: the sigma embedder, the AdaLN modulation
        layers and, for classification, the label embedding and final AdaLN (language models: none)."""
        extra = sum(p.numel() for p in self.sigma_embedder.parameters()) if self.sigma_embedder else 0
        for layer in self.layers:
            modulation = getattr(layer, "modulation", None)
            if isinstance(modulation, nn.Module):
                extra += sum(p.numel() for p in modulation.parameters())
        if self.task == "classification":
            extra += self.label_embedding.numel()
            if self.native_readout:
                extra += sum(p.numel() for p in self.final_modulation.parameters())
        return extra

    def block_parameters(self, block: int) -> list[nn.Parameter]:
        """The parameters of block ``block``'s layers (wrappers included)."""
        return [p for i in self.block_layers[block] for p in self.layers[i].parameters()]

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters used by every block: stem, head, embeddings, sigma embedder."""
        in_layers = {id(p) for p in self.layers.parameters()}
        return [p for p in self.parameters() if id(p) not in in_layers]

    @contextlib.contextmanager
    def running(self, indices: list[int]) -> Iterator[LayerStack]:
        """Install a ModuleList of only these layers in the user's model, restoring the full list after."""
        active = like_stack(self.layers, (self.layer_runners[i] for i in indices))
        # The first time a layer runs, check it keeps the hidden shape (a residual layer). These
        # hooks are registered before the task's hooks, so they see the layer's own output.
        unchecked = [pos for pos, i in enumerate(indices) if i not in self._checked_layers]
        handles = [active[pos].register_forward_hook(self._check_shape) for pos in unchecked]
        set_layers(self.model, self.spec.layers, active)
        try:
            yield active
            self._checked_layers.update(indices[pos] for pos in unchecked)
        finally:
            for handle in handles:
                handle.remove()
            set_layers(self.model, self.spec.layers, self.layers)

    # ------------------------------------------------------------------ training

    def loss(
        self,
        batch: Batch,
        block: int,
        generator: torch.Generator | None = None,
        layer_indices: list[int] | None = None,
        weighting: str | None = None,
    ) -> torch.Tensor:
        """The weighted DiffusionBlocks loss of one step on ``block`` (sigma, or t, drawn in its range).
        ``layer_indices`` runs other layers under the same construction (the activation check runs
        all of them: the conditioned model at full depth); ``weighting`` overrides the model's."""
        check_batch(self.task, self.spec.name, batch)
        inputs = batch["inputs"]
        indices = self.block_layers[block] if layer_indices is None else layer_indices
        if self.task == "masked-diffusion-lm":
            mask_id = cast(int, self.spec.mask_token_id)  # the spec checks it for this task
            logits_of = functools.partial(self.masked_logits, indices=indices)
            loss_args = (self.ranges[block], weighting or self.weighting, generator, self.spec.masking_schedule)
            return block_loss(logits_of, inputs, mask_id, *loss_args)
        lo, hi = self.ranges[block]
        sigma = sample_sigma(inputs.shape[0], lo, hi, generator=generator, device=inputs.device)
        if self.task == "classification":
            x0 = F.normalize(self.label_embedding, dim=-1)[batch["targets"]]
            z = x0 + sigma[:, None] * self._noise(x0, generator)
            logits = self.classification_logits(inputs, z, sigma, indices)
            per_sample = F.cross_entropy(logits.float(), batch["targets"], reduction="none")
        elif self.task == "causal-lm":
            targets = batch["targets"]
            x0 = F.normalize(self.input_embedding(targets), dim=-1)
            z = x0 + sigma[:, None, None] * self._noise(x0, generator)
            logits = self.lm_logits(inputs, z, sigma, indices)
            per_sample = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
            per_sample = per_sample.view(targets.shape).mean(dim=1)
        else:
            x0 = inputs
            z = x0 + broadcast_per_sample(sigma, x0) * self._noise(x0, generator)
            d = self.denoise(z, sigma, indices, batch.get("labels"))
            per_sample = ((d.float() - x0.float()) ** 2).flatten(1).mean(dim=1)
        return weighted_loss(per_sample, sigma, weighting or self.weighting)

    @staticmethod
    def _noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if generator is None:
            return torch.randn_like(like)
        return torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)

    # ------------------------------------------------------------------ one block as a denoiser

    def _condition(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma)
        if self.sigma_embedder is not None:
            self.context.cond = self.sigma_embedder(c_noise)
        return c_skip, c_out, c_in, c_noise

    def _call_with_hooks(self, active: LayerStack, pre, post, *args) -> torch.Tensor:
        handles = [active[0].register_forward_pre_hook(pre), active[-1].register_forward_hook(post)]
        try:
            return self.model(*args)
        finally:
            for handle in handles:
                handle.remove()

    def classification_logits(
        self, inputs: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor, indices: list[int]
    ) -> torch.Tensor:
        """Logits read off D(z, sigma) of the given layers (the authors' readout where the
        model has ``features`` and ``head``, hooks at the CLS position otherwise)."""
        c_skip, c_out, c_in, _ = self._condition(sigma)
        noisy_in = c_in[:, None] * z
        if self.native_readout:
            with self.running(indices):
                f = self.model.features(inputs, cls=noisy_in)
            d = c_out[:, None] * f.float() + c_skip[:, None] * z
            shift, scale = modulation_of(self.final_modulation, self.context.get()).float().chunk(2, dim=-1)
            head = self.model.head
            return head((d * (1 + scale) + shift).to(head.weight.dtype))

        def pre(_module, args):
            h = args[0]
            if h.dim() != 3:
                raise SpecError(
                    f"Task 'classification' of {self.spec.name!r}: the layers' hidden state has shape "
                    f"{list(h.shape)}; DiffusionBlocks needs (N, tokens, d) with a CLS token at index 0 "
                    "(the token the head reads)."
                )
            h = torch.cat([noisy_in.to(h.dtype)[:, None, :], h[:, 1:]], dim=1)
            return (h, *args[1:])

        def post(_module, _args, out):
            h = first_output(out)
            d = c_skip[:, None] * z + c_out[:, None] * h[:, 0].float()
            return replace_first_output(out, torch.cat([d.to(h.dtype)[:, None, :], h[:, 1:]], dim=1))

        with self.running(indices) as active:
            return self._call_with_hooks(active, pre, post, inputs)

    def lm_logits(self, inputs: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """(N, T, V) logits from D at the noisy positions of the 2T sequence (``lm_layout``)."""
        c_skip, c_out, c_in, _ = self._condition(sigma)
        noisy_in = c_in[:, None, None] * z
        n, t = z.shape[0], z.shape[1]
        concatenated = self.lm_layout == "concatenated"

        def pre(_module, args):
            h = args[0]
            noisy = noisy_in.to(h.dtype) + h
            doubled = torch.cat([h, noisy], dim=1) if concatenated else torch.stack([h, noisy], dim=2)
            return (doubled.reshape(n, 2 * t, h.shape[-1]), *args[1:])

        def post(_module, _args, out):
            h = first_output(out)
            f = h[:, t:] if concatenated else h.view(n, t, 2, h.shape[-1])[:, :, 1]
            d = c_skip[:, None, None] * z + c_out[:, None, None] * f.float()
            return replace_first_output(out, d.to(h.dtype))

        if concatenated:
            mask = concatenated_attention_mask(t, inputs.device)
            positions = concatenated_positions(t, inputs.device)
            layout = SequenceLayout.concatenated(t, mask, positions)
        else:
            layout = SequenceLayout.interleaved(t, inputs.device)
        adapter = self.spec.position_adapter
        rewrite = adapter(self.model, layout) if adapter is not None else guard_rewrite(self.spec.name, layout)
        with self.running(indices) as active:
            if adapter is not None:
                # The model computes per-position tensors outside its layers (HF Llama's rotary
                # tables and 4-D mask): its adapter rebuilds them for this layout.
                handles = install_rewrite(list(active), [self._user_layer(i) for i in indices], rewrite)
            elif concatenated:
                extra = {"attn_mask": mask, "positions": positions}
                refusal = self._layout_refusal

                def add_kwargs(_module, args, kwargs):
                    if refusal:
                        raise UnsupportedLayoutError(refusal)
                    return args, {**kwargs, **extra}

                # The guard first: layers handed per-position tensors are refused with the reason.
                handles = install_rewrite(list(active), [self._user_layer(i) for i in indices], rewrite)
                handles += [layer.register_forward_pre_hook(add_kwargs, with_kwargs=True) for layer in active]
            else:
                handles = install_rewrite(list(active), [self._user_layer(i) for i in indices], rewrite)
            try:
                return self._call_with_hooks(active, pre, post, inputs)
            finally:
                for handle in handles:
                    handle.remove()

    def masked_logits(self, z: torch.Tensor, t: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """(N, T, V) logits of the masked sequence z from these layers, conditioned on t."""
        self.context.cond = cast(SigmaEmbedder, self.sigma_embedder)(t)
        with self.running(indices):
            return self.model(z)

    def _user_layer(self, index: int) -> nn.Module:
        """The user's own layer ``index``, inside its AdaLN-Zero wrapper (whose signature names
        the positional arguments the model's forward passes)."""
        layer = self.layers[index]
        return layer.layer if isinstance(layer, (AdaLNZeroBlock, GenericAdaLNZero)) else layer

    def denoise(
        self, z: torch.Tensor, sigma: torch.Tensor, indices: list[int], labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """D(z, sigma) = c_skip*z + c_out*model(c_in*z, c_noise, labels), with only these layers."""
        c_skip, c_out, c_in, c_noise = self._condition(sigma)
        with self.running(indices):
            f = self.model(broadcast_per_sample(c_in, z) * z, c_noise, labels)
        return broadcast_per_sample(c_skip, z) * z + broadcast_per_sample(c_out, z) * f.float()

    def _check_shape(self, module, args, out) -> None:
        x, y = args[0] if args else None, first_output(out)
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape != y.shape:
            raise SpecError(
                f"A layer of {self.spec.layers!r} in {self.spec.name!r} maps shape {list(x.shape)} to "
                f"{list(y.shape)}: it is not shape-preserving, so it is not a residual layer (h + f(h)). "
                "DiffusionBlocks needs every layer in ModelSpec.layers to keep the hidden shape; move "
                "projections and heads out of that ModuleList."
            )

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)
