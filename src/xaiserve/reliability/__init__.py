"""APEM (seed 004): the adversarial perturbation reliability of a map, its batched eps search and the filter that removes a map's noise."""
