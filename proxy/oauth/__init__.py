"""OAuth2 for v3: the token set and its store, the token endpoint's client, the refresher
(`tokens.py`), the token set shared through Redis (`redis_store.py`), and `ctct-proxy login`
(`login.py`)."""
