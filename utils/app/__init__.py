"""The web app (`app.py`): loading its models (`loading.py`), running its requests (`requests.py`), showing the
results (`present.py`) and the Gradio page (`ui.py`). Everything but `ui.py` works without Gradio."""
