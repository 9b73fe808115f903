"""consolegate's management side: keys, token minting, API, storage, fleet and audit."""
