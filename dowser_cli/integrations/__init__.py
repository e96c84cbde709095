"""Integrations with the training stacks people already use (DESIGN section 3: above the cores,
below the CLI): ``hf`` for the Hugging Face Trainer and TRL's SFTTrainer."""
