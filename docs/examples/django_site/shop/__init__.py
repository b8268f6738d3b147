"""The shop app: its Flowrra tasks (tasks.py), the views that queue them and a command."""
