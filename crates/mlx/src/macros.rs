// SPDX-License-Identifier: EUPL-1.2
//! Macros for this crate and the crates built on it.

/// `impl Display` for types whose `name()` is how they are written.
///
/// ```
/// struct Colour;
/// impl Colour {
///     fn name(&self) -> &'static str {
///         "red"
///     }
/// }
/// mlx::display_by_name!(Colour);
/// assert_eq!(Colour.to_string(), "red");
/// ```
#[macro_export]
macro_rules! display_by_name {
    ($($t:ty),+ $(,)?) => {$(
        impl ::std::fmt::Display for $t {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.name())
            }
        }
    )+};
}
