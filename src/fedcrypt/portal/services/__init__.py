"""The portal's business logic, independent of HTTP: accounts, federations, rounds."""
