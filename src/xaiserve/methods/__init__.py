"""Attribution methods, one per module, and the registry that names them."""
