"""The client-facing edge: the HTTP server and its parser limits (`server.py`), the middleware
that turns errors into answers and writes the request line (`middleware.py`), and the operator
endpoints (`ops.py`)."""
