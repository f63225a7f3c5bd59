// SPDX-License-Identifier: EUPL-1.2
//! Crate-private macros.

/// Chainable builder setters. Each entry keeps its own doc comment:
///
/// ```text
/// /// Sets [`seed`](Self::seed).
/// seed(seed: u64) = Some(seed);
/// /// This token with its log-probability set.
/// with_logprob(logprob: f32) => logprob = Some(logprob);
/// ```
///
/// becomes `#[must_use] pub fn seed(mut self, seed: u64) -> Self { self.seed = Some(seed); self }`;
/// the `=> field` form sets a field whose name differs from the setter's, and a setter may take
/// one type parameter (`name<S: Into<String>>(...)`).
macro_rules! setters {
    () => {};
    (
        $(#[$meta:meta])* $name:ident $(<$gen:ident: $bound:path>)? ($arg:ident: $ty:ty) => $field:ident = $value:expr;
        $($rest:tt)*
    ) => {
        $(#[$meta])*
        #[must_use]
        pub fn $name $(<$gen: $bound>)? (mut self, $arg: $ty) -> Self {
            self.$field = $value;
            self
        }
        setters!($($rest)*);
    };
    (
        $(#[$meta:meta])* $name:ident $(<$gen:ident: $bound:path>)? ($arg:ident: $ty:ty) = $value:expr;
        $($rest:tt)*
    ) => {
        setters!($(#[$meta])* $name $(<$gen: $bound>)? ($arg: $ty) => $name = $value; $($rest)*);
    };
}
