"""Key management: SSH and PGP key pairs, PuTTY import, export, backup."""
