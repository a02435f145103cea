"""Class activation maps: a layer's activations weighted per channel."""
