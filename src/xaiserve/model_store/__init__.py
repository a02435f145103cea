"""The demo model: a synthetic shape data set, a small CNN, its training and its model directory."""
