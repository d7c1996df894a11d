//! Which guests pinner places, and under which policy.
//!
//! A guest's policy is, in order: the word its owner put in pinner's
//! metadata; else the first `[openstack] flavor_policy` pattern its nova
//! flavor matches; else the host's `default_policy`. On a node where nova
//! pins (`cpu_dedicated_set` or `cpu_shared_set` in nova.conf), nova's own
//! guests are nova's: those it pins are left alone, those it floats over
//! `cpu_shared_set` too unless `place_floating` lets pinner range-bind them
//! within that set.

use crate::engine::cpuset::CpuSet;
use crate::engine::domain::{DomainSpec, Policy};

/// `[[openstack.flavor_policy]]`: guests of a flavor whose name matches
/// `pattern` (`*` any run of characters, `?` any one) get `policy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlavorRule {
    pub pattern: String,
    pub policy: Policy,
}

/// The host's rules for guests that name no policy of their own.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyRules {
    /// `default_policy`.
    pub default: Policy,
    /// The first matching rule wins.
    pub flavors: Vec<FlavorRule>,
    /// `[openstack] place_floating`.
    pub place_floating: bool,
}

/// What pinner does with one guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Placed under this policy (never `Policy::None`).
    Place(Policy),
    /// Pinned by someone else (nova, an operator): left alone, and these
    /// CPUs are theirs alone.
    Foreign { taken: CpuSet },
    /// Floated by nova over its shared set: left alone, its CPUs shared.
    NovaFloating,
    /// Left alone, for the reason given.
    LeftAlone(String),
}

impl Decision {
    /// How status names a guest pinner does not place (`foreign` or
    /// `none`), and why; None for a guest it places.
    pub fn left_alone(&self) -> Option<(&'static str, String)> {
        match self {
            Decision::Place(_) => None,
            Decision::Foreign { .. } => Some(("foreign", "pinned by someone else; left alone".into())),
            Decision::NovaFloating => Some((
                "foreign",
                "floated by nova over cpu_shared_set; left alone ([openstack] place_floating = true lets pinner place it there)".into(),
            )),
            Decision::LeftAlone(why) => Some(("none", why.clone())),
        }
    }
}

impl PolicyRules {
    /// What pinner does with `spec`; `nova_pins`: the node is one where
    /// nova pins (its dedicated or shared set is known).
    pub fn decide(&self, spec: &DomainSpec, nova_pins: bool) -> Decision {
        if nova_pins && spec.nova.is_some() {
            return self.decide_nova(spec);
        }
        if spec.is_foreign() {
            return Decision::Foreign {
                taken: spec.pinned_cpus(),
            };
        }
        match self.policy_of(spec) {
            (Policy::None, source) => Decision::LeftAlone(source.why_none(spec)),
            (policy, _) => Decision::Place(policy),
        }
    }

    /// A nova guest where nova pins: its pins are nova's, unless it floats
    /// and pinner may place floating guests (or placed it so before).
    fn decide_nova(&self, spec: &DomainSpec) -> Decision {
        let ours = spec.metadata.as_ref();
        if ours.is_some_and(|m| m.policy == Some(Policy::None)) {
            return Decision::LeftAlone(PolicySource::Owner.why_none(spec));
        }
        if spec.is_nova_floating() {
            return match self.place_floating {
                true => Decision::Place(Policy::Shared),
                false => Decision::NovaFloating,
            };
        }
        match ours {
            Some(_) if self.place_floating => Decision::Place(Policy::Shared),
            Some(_) => Decision::LeftAlone(
                "nova's guest, placed by pinner before; [openstack] place_floating is off: left alone".into(),
            ),
            None => Decision::Foreign {
                taken: spec.pinned_cpus(),
            },
        }
    }

    /// The policy of a guest pinner may place, and whose word it is: its
    /// owner's, its flavor's, or the host's default.
    pub fn policy_of(&self, spec: &DomainSpec) -> (Policy, PolicySource) {
        if let Some(policy) = spec.metadata.as_ref().and_then(|m| m.policy) {
            return (policy, PolicySource::Owner);
        }
        let flavor = spec.nova.as_ref().and_then(|n| n.flavor.as_deref());
        match flavor.and_then(|f| self.flavors.iter().find(|r| glob_match(&r.pattern, f))) {
            Some(rule) => (rule.policy, PolicySource::Flavor(rule.pattern.clone())),
            None => (self.default, PolicySource::HostDefault),
        }
    }
}

/// Whose word a guest's policy is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// `policy` in pinner's metadata on the guest.
    Owner,
    /// The `[[openstack.flavor_policy]]` pattern its flavor matched.
    Flavor(String),
    /// `default_policy`.
    HostDefault,
}

impl PolicySource {
    /// Why a guest whose policy came from here as `none` is left alone.
    fn why_none(&self, spec: &DomainSpec) -> String {
        match self {
            PolicySource::Owner => "opted out (policy none); left alone".into(),
            PolicySource::Flavor(pattern) => {
                let flavor = spec.nova.as_ref().and_then(|n| n.flavor.as_deref());
                format!(
                    "flavor {:?} matches {pattern:?} (policy none); left alone",
                    flavor.unwrap_or_default()
                )
            }
            PolicySource::HostDefault => {
                "default_policy is none: left alone until its metadata names a policy".into()
            }
        }
    }
}

/// Whether `text` matches `pattern`: `*` any run of characters (none
/// too), `?` any one, everything else itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and the text position it has taken up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                // Let the last `*` take one more character.
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(xml_extra: &str, vcpu: &str) -> DomainSpec {
        DomainSpec::parse(&format!(
            "<domain><name>g</name>{vcpu}<metadata>{xml_extra}</metadata></domain>"
        ))
        .unwrap()
    }

    const NOVA: &str = r#"<nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1"><nova:flavor name="cpu.large"/></nova:instance>"#;
    const OURS_NONE: &str = r#"<p:state xmlns:p="urn:pinner:1" policy="none"/>"#;
    const OURS_PLACED: &str = r#"<p:state xmlns:p="urn:pinner:1" mode="shared"/>"#;

    #[test]
    fn globs() {
        for (pattern, text, matches) in [
            ("cpu.*", "cpu.large", true),
            ("cpu.*", "cpu.", true),
            ("cpu.*", "gpu.large", false),
            ("*", "", true),
            ("*.large", "m1.large", true),
            ("m?.small", "m1.small", true),
            ("m?.small", "m10.small", false),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ] {
            assert_eq!(glob_match(pattern, text), matches, "{pattern} ~ {text}");
        }
    }

    #[test]
    fn owner_then_flavor_then_default() {
        let rules = PolicyRules {
            default: Policy::None,
            flavors: vec![
                FlavorRule {
                    pattern: "cpu.*".into(),
                    policy: Policy::Dedicated,
                },
                FlavorRule {
                    pattern: "*".into(),
                    policy: Policy::Auto,
                },
            ],
            place_floating: false,
        };
        let plain = "<vcpu>2</vcpu>";
        let alone = |d: Decision| match d {
            Decision::LeftAlone(why) => why,
            other => panic!("{other:?}"),
        };
        assert!(alone(rules.decide(&spec("", plain), false)).starts_with("default_policy is none"));
        assert_eq!(
            rules.decide(&spec(NOVA, plain), false),
            Decision::Place(Policy::Dedicated)
        );
        let m1 = NOVA.replace("cpu.large", "m1.small");
        assert_eq!(
            rules.decide(&spec(&m1, plain), false),
            Decision::Place(Policy::Auto)
        );
        let owner = format!("{NOVA}{}", OURS_NONE);
        assert!(alone(rules.decide(&spec(&owner, plain), false)).starts_with("opted out"));
        let rules = PolicyRules {
            flavors: vec![FlavorRule {
                pattern: "m1.*".into(),
                policy: Policy::None,
            }],
            ..rules
        };
        assert_eq!(
            alone(rules.decide(&spec(&m1, plain), false)),
            "flavor \"m1.small\" matches \"m1.*\" (policy none); left alone"
        );
        let shared = r#"<p:state xmlns:p="urn:pinner:1" policy="shared"/>"#;
        assert_eq!(
            rules.decide(&spec(shared, plain), false),
            Decision::Place(Policy::Shared)
        );
    }

    #[test]
    fn where_nova_pins_its_guests_are_novas_unless_floating_ones_are_let() {
        let floating = "<vcpu cpuset='4-7'>2</vcpu>";
        let pinned = "<vcpu>2</vcpu><cputune><vcpupin vcpu='0' cpuset='8'/><vcpupin vcpu='1' cpuset='9'/></cputune>";
        let mut rules = PolicyRules::default();
        assert_eq!(
            rules.decide(&spec(NOVA, floating), true),
            Decision::NovaFloating
        );
        let nova_pinned = DomainSpec::parse(&format!(
            "<domain><name>g</name>{pinned}<metadata>{NOVA}</metadata></domain>"
        ))
        .unwrap();
        assert!(
            matches!(rules.decide(&nova_pinned, true), Decision::Foreign { taken } if taken.to_string() == "8-9")
        );
        rules.place_floating = true;
        assert_eq!(
            rules.decide(&spec(NOVA, floating), true),
            Decision::Place(Policy::Shared)
        );
        // Placed by pinner before (its metadata, its pins): still its own.
        let placed = DomainSpec {
            vcpu_pins: nova_pinned.vcpu_pins.clone(),
            ..spec(&format!("{NOVA}{OURS_PLACED}"), floating)
        };
        assert_eq!(rules.decide(&placed, true), Decision::Place(Policy::Shared));
        assert!(matches!(
            rules.decide(&nova_pinned, true),
            Decision::Foreign { .. }
        ));
        let released = spec(&format!("{NOVA}{OURS_NONE}"), floating);
        assert!(matches!(
            rules.decide(&released, true),
            Decision::LeftAlone(_)
        ));
        // Where nova does not pin, its guests are guests like any other.
        assert!(matches!(
            rules.decide(&spec(NOVA, floating), false),
            Decision::Foreign { .. }
        ));
    }
}
