"""Built-in tasks (datasets and models), made with the public :class:`fedcrypt.Task` API."""
