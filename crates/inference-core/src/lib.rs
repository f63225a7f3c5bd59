// SPDX-License-Identifier: EUPL-1.2
//! Backend-neutral inference API (work in progress).
