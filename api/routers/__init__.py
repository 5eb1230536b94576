"""The API's routes, one module per area; ``api.main.create_app`` includes them in this order."""
