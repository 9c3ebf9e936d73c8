"""gRPC servicers: proto in, store calls, proto out. Errors become statuses here."""
