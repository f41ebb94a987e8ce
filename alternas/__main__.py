"""``python -m alternas`` runs the CLI (also what ``torchrun -m alternas`` starts on every rank)."""

from alternas.cli import main

main()
