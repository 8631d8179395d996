"""The diffattn Gradio app (not available yet)."""
