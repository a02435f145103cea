"""Methods that differentiate the model with respect to its input."""
