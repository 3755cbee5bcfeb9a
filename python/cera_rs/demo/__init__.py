"""The main job: small real training runs that show what CeRA is for."""
