// SPDX-License-Identifier: EUPL-1.2
//! A radix tree over token ids: each edge carries a run of tokens, each node
//! may hold a value for the sequence that leads to it. It answers the prompt
//! cache's question — which stored sequences share the longest prefix with a
//! prompt — in one walk down the prompt plus one visit of every node, instead
//! of comparing the prompt with every stored sequence.

use std::collections::BTreeMap;

/// A radix tree from token sequences to values.
pub(super) struct RadixTree<V> {
    /// Node 0 is the root (an empty label); removed nodes wait in `free` to be reused.
    nodes: Vec<Node<V>>,
    free: Vec<usize>,
    len: usize,
}

struct Node<V> {
    /// The tokens on the edge from the parent.
    label: Vec<u32>,
    /// Children by the first token of their label.
    children: BTreeMap<u32, usize>,
    value: Option<V>,
    parent: usize,
}

impl<V> Node<V> {
    fn new(label: Vec<u32>, parent: usize) -> Node<V> {
        Node { label, children: BTreeMap::new(), value: None, parent }
    }
}

/// How many leading tokens `a` and `b` share.
fn shared(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl<V> RadixTree<V> {
    /// An empty tree.
    pub(super) fn new() -> RadixTree<V> {
        RadixTree { nodes: vec![Node::new(Vec::new(), 0)], free: Vec::new(), len: 0 }
    }

    /// Values held.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    fn node(&self, i: usize) -> &Node<V> {
        &self.nodes[i]
    }

    fn node_mut(&mut self, i: usize) -> &mut Node<V> {
        &mut self.nodes[i]
    }

    fn release(&mut self, i: usize) {
        self.nodes[i] = Node::new(Vec::new(), 0);
        self.free.push(i);
    }

    fn alloc(&mut self, node: Node<V>) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.nodes[i] = node;
                i
            }
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        }
    }

    /// The node for exactly `key`, if there is one.
    fn find(&self, key: &[u32]) -> Option<usize> {
        let (mut at, mut pos) = (0, 0);
        while pos < key.len() {
            let child = *self.node(at).children.get(&key[pos])?;
            let label = &self.node(child).label;
            if key.len() - pos < label.len() || key[pos..pos + label.len()] != label[..] {
                return None;
            }
            pos += label.len();
            at = child;
        }
        Some(at)
    }

    /// The value stored for exactly `key`.
    #[cfg(test)]
    pub(super) fn get(&self, key: &[u32]) -> Option<&V> {
        self.find(key).and_then(|n| self.node(n).value.as_ref())
    }

    /// Stores `value` for `key`; returns the value it replaces.
    pub(super) fn insert(&mut self, key: &[u32], value: V) -> Option<V> {
        let (mut at, mut pos) = (0, 0);
        while pos < key.len() {
            let Some(&child) = self.node(at).children.get(&key[pos]) else {
                let leaf = self.alloc(Node::new(key[pos..].to_vec(), at));
                self.node_mut(at).children.insert(key[pos], leaf);
                at = leaf;
                break;
            };
            let common = shared(&self.node(child).label, &key[pos..]);
            if common < self.node(child).label.len() {
                // Split the edge: a new node for the shared part, the old child below it.
                let rest = self.node_mut(child).label.split_off(common);
                let head = std::mem::replace(&mut self.node_mut(child).label, rest);
                let mid = self.alloc(Node::new(head, at));
                let first = self.node(child).label[0];
                self.node_mut(mid).children.insert(first, child);
                self.node_mut(child).parent = mid;
                self.node_mut(at).children.insert(key[pos], mid);
                at = mid;
            } else {
                at = child;
            }
            pos += common;
        }
        let old = self.node_mut(at).value.replace(value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Takes the value stored for `key` out, pruning the nodes it no longer needs.
    pub(super) fn remove(&mut self, key: &[u32]) -> Option<V> {
        let at = self.find(key)?;
        let value = self.node_mut(at).value.take()?;
        self.len -= 1;
        self.prune(at);
        Some(value)
    }

    /// Drops `at` if it holds nothing and leads nowhere, and merges a node
    /// with one child and no value into that child (the root stays).
    fn prune(&mut self, mut at: usize) {
        while at != 0 {
            let node = self.node(at);
            if node.value.is_some() {
                return;
            }
            match node.children.len() {
                0 => {
                    let (parent, first) = (node.parent, node.label[0]);
                    self.node_mut(parent).children.remove(&first);
                    self.release(at);
                    at = parent;
                }
                1 => {
                    let (Some(&child), parent, first) = (node.children.values().next(), node.parent, node.label[0])
                    else {
                        return;
                    };
                    let mut label = std::mem::take(&mut self.node_mut(at).label);
                    label.extend_from_slice(&self.node(child).label);
                    let c = self.node_mut(child);
                    c.label = label;
                    c.parent = parent;
                    self.node_mut(parent).children.insert(first, child);
                    self.release(at);
                    return;
                }
                _ => return,
            }
        }
    }

    /// Every value with the number of leading tokens its sequence shares
    /// with `key`, longest first (ties in tree order).
    pub(super) fn by_shared_prefix(&self, key: &[u32]) -> Vec<(usize, &V)> {
        let mut out = Vec::with_capacity(self.len);
        // (node, tokens shared with `key` by the path to it, whether that path is all of key's start)
        let mut stack = vec![(0usize, 0usize, true)];
        while let Some((at, depth, matching)) = stack.pop() {
            let node = self.node(at);
            if let Some(v) = &node.value {
                out.push((depth, v));
            }
            for &child in node.children.values() {
                let label = &self.node(child).label;
                if matching {
                    let common = shared(label, key.get(depth..).unwrap_or(&[]));
                    stack.push((child, depth + common, common == label.len()));
                } else {
                    stack.push((child, depth, false));
                }
            }
        }
        out.sort_by_key(|&(n, _)| std::cmp::Reverse(n));
        out
    }

    /// The values stored for proper prefixes of `key` (not `key` itself).
    pub(super) fn prefixes_of(&self, key: &[u32]) -> Vec<(usize, &V)> {
        let mut out = Vec::new();
        let (mut at, mut pos) = (0, 0);
        while pos < key.len() {
            if let Some(v) = &self.node(at).value {
                out.push((pos, v));
            }
            let Some(&child) = self.node(at).children.get(&key[pos]) else { break };
            let label = &self.node(child).label;
            if key.len() - pos < label.len() || key[pos..pos + label.len()] != label[..] {
                break;
            }
            pos += label.len();
            at = child;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(mut v: Vec<(usize, &u32)>) -> Vec<(usize, u32)> {
        v.sort();
        v.into_iter().map(|(n, &x)| (n, x)).collect()
    }

    #[test]
    fn finds_what_shares_the_longest_prefix() {
        let mut t = RadixTree::new();
        assert_eq!(t.insert(&[1, 2, 3, 4], 1), None);
        assert_eq!(t.insert(&[1, 2, 5], 2), None);
        assert_eq!(t.insert(&[1, 2], 3), None);
        assert_eq!(t.insert(&[7], 4), None);
        assert_eq!(t.insert(&[1, 2, 5], 5), Some(2));
        assert_eq!(t.len(), 4);
        assert_eq!(t.get(&[1, 2, 5]), Some(&5));
        assert_eq!(t.get(&[1, 2, 3]), None);
        let found = t.by_shared_prefix(&[1, 2, 3, 9]);
        assert_eq!(found[0], (3, &1));
        assert_eq!(sorted(found), vec![(0, 4), (2, 3), (2, 5), (3, 1)]);
        assert_eq!(sorted(t.by_shared_prefix(&[])), vec![(0, 1), (0, 3), (0, 4), (0, 5)]);
        let prefixes: Vec<(usize, u32)> = t.prefixes_of(&[1, 2, 5, 6]).into_iter().map(|(n, &v)| (n, v)).collect();
        assert_eq!(prefixes, vec![(2, 3), (3, 5)]);
        assert!(t.prefixes_of(&[1, 2]).is_empty());
    }

    #[test]
    fn removing_prunes_and_merges_nodes() {
        let mut t = RadixTree::new();
        t.insert(&[1, 2, 3, 4], 1);
        t.insert(&[1, 2, 5], 2);
        t.insert(&[1, 2], 3);
        assert_eq!(t.remove(&[1, 2]), Some(3));
        assert_eq!(t.remove(&[1, 2]), None);
        assert_eq!(t.remove(&[1, 2, 5]), Some(2));
        // [1, 2] and [3, 4] merged back into one edge.
        assert_eq!(t.nodes.len() - t.free.len(), 2, "the root and one leaf");
        assert_eq!(t.get(&[1, 2, 3, 4]), Some(&1));
        assert_eq!(sorted(t.by_shared_prefix(&[1, 2, 3])), vec![(3, 1)]);
        assert_eq!(t.remove(&[1, 2, 3, 4]), Some(1));
        assert_eq!(t.len(), 0);
        assert_eq!(t.nodes.len() - t.free.len(), 1);
        // Freed nodes are reused.
        let allocated = t.nodes.len();
        t.insert(&[9, 9], 7);
        assert_eq!(t.nodes.len(), allocated);
        assert_eq!(t.get(&[9, 9]), Some(&7));
    }

    #[test]
    fn agrees_with_comparing_every_sequence() {
        // A small deterministic generator: sequences over a tiny alphabet share many prefixes.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n) as u32
        };
        let mut t = RadixTree::new();
        let mut all: Vec<Vec<u32>> = Vec::new();
        for i in 0..400 {
            let len = next(8) as usize;
            let key: Vec<u32> = (0..len).map(|_| next(3)).collect();
            if i % 3 == 2 && !all.is_empty() {
                let gone = all.swap_remove(next(all.len() as u64) as usize);
                assert!(t.remove(&gone).is_some());
            } else if !all.contains(&key) {
                t.insert(&key, 0u32);
                all.push(key.clone());
            }
            assert_eq!(t.len(), all.len());
            let probe: Vec<u32> = (0..next(9)).map(|_| next(3)).collect();
            let mut want: Vec<usize> = all.iter().map(|k| shared(k, &probe)).collect();
            want.sort_unstable_by(|a, b| b.cmp(a));
            let got: Vec<usize> = t.by_shared_prefix(&probe).into_iter().map(|(n, _)| n).collect();
            assert_eq!(got, want, "probe {probe:?}");
            let prefixes = t.prefixes_of(&probe).len();
            assert_eq!(prefixes, all.iter().filter(|k| k.len() < probe.len() && probe.starts_with(k)).count());
        }
    }
}
