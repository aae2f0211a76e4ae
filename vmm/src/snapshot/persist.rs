//! The `Persist` trait: how a live component turns into its plain state and back.
//!
//! `save` cannot fail (it reads what the component already holds); `restore` is a constructor
//! that validates the state. vCPUs do not implement it: their save and restore are KVM ioctls
//! that can fail, on a vCPU that already exists (`Vcpu::save_state`/`restore_state`).

/// A component with a serializable state.
pub trait Persist: Sized {
    /// The plain, serde-able state.
    type State;
    /// What restoring needs besides the state (output writers, channels …).
    type ConstructorArgs;
    /// Why a state cannot be restored.
    type Error;

    fn save(&self) -> Self::State;
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
