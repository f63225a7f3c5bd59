// SPDX-License-Identifier: EUPL-1.2
//! Crate-private macros.

/// `impl Display` for types whose `name()` is how they are written.
macro_rules! display_by_name {
    ($($t:ty),+ $(,)?) => {$(
        impl ::std::fmt::Display for $t {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.name())
            }
        }
    )+};
}
