"""The HTTP API (``pacsbridge api``): not built yet, see the API issue."""
