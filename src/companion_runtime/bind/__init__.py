"""The bind layer: real I/O (HTTPS, files, processes, sockets) that feeds the pure core."""
