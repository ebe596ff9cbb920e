"""The kiosk's physical side: printer and spool, the durable notice outbox."""
