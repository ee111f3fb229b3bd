"""`python -m fmoe` runs the CLI (useful where pip's script folder is not on PATH)."""

from fmoe.cli import main

main()
