from lightning_memdec.cli import main

main()
