"""`python -m flame` is the `flame` command (used by tests and `accelerate launch -m flame`)."""

from flame.cli.app import main

if __name__ == "__main__":
    main()
