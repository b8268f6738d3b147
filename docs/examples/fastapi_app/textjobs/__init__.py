"""The text-jobs service: its Flowrra tasks (tasks.py) and its FastAPI app (main.py)."""
