from lightning_memdec.cli import main

if __name__ == "__main__":  # python -m lightning_memdec; importing this module runs nothing
    main()
