"""The etcd cluster subject: three real etcd members on loopback, a load generator,
an observer over their own endpoints, actions through etcd's admin API, and chaos."""
