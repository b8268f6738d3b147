"""The reports service: its Flowrra tasks (tasks.py) and its Flask app (web.py)."""
