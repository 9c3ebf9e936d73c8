"""The gRPC servicers and interceptors; proto <-> domain conversion happens here."""
