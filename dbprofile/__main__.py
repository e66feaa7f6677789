from dbprofile.cli import main

main()
