"""`python -m spectool` runs the command line (also under torchrun)."""

from spectool.cli import main

if __name__ == "__main__":
    main()
