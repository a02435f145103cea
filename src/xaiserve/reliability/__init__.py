"""APEM (seed 004): the adversarial perturbation reliability of a map, its batched eps
search, and the filter that keeps the part of a map the model relies on."""
