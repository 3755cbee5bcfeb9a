"""Integrations with fine-tuning frameworks: ``axolotl`` (the plugin; needs Axolotl) and
``axolotl_config`` (its config translation, which needs nothing of Axolotl)."""
