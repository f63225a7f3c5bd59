// SPDX-License-Identifier: EUPL-1.2
fn main() {}
