//! The listener and the cache of an instance: changes reaching the cache, forced interleavings,
//! the refill after a flush, the listener under trouble, the round trip through the real
//! triggers, and stopping an instance.

mod faults;
mod propagation;
mod properties;
mod races;
mod refill;
mod resilience;
mod shutdown;
mod timeouts;
mod wire;
