"""Model definitions. Each wires layers together with Hugging Face parameter names so that loading
is a small mapping table (see `registry.py`)."""
