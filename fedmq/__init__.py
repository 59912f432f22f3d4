"""fedmq: federated learning over RabbitMQ."""

__version__ = "0.1.0"
