"""The base model's code (Llama family), its provisioning, and the deltas a step applies."""
