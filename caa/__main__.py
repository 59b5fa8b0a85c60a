"""``python -m caa`` (and ``accelerate launch -m caa``) runs the command line."""

from caa.cli import main

if __name__ == "__main__":
    main()
