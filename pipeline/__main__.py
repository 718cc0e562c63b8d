"""`python -m pipeline` is the same as the `synthaug` command."""

from .cli import main

if __name__ == "__main__":
    main()
