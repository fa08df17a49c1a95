"""The Gradio app: AR and Jacobi decoding side by side, with convergence and speed charts.

``app.race`` runs lanes, ``app.render`` and ``app.charts`` turn traces into HTML and plotly figures,
``app.ui`` wires them into Gradio, ``app.main`` parses flags, loads the model once and launches.
"""
