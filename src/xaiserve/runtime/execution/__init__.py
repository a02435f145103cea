"""Device work of the requests in flight, packed into shared calls (:mod:`.executor`)."""
