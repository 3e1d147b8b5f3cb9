"""``train_alcf.sh``'s engine: environment variables -> settings, run directory, launch command."""
