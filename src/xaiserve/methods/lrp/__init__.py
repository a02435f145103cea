"""Layer-wise relevance propagation over a traced graph."""
