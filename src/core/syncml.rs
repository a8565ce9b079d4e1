//! The SyncML fragment that replaces a device's push PFN through the DMClient
//! CSP.
//!
//! The gateway does not speak OMA-DM: the MDM server pastes this fragment
//! into the `SyncBody` of the session the device opened. The fragment holds
//! three commands:
//!
//! 1. `Replace` (or `Add` when the node was never set) of
//!    `./Vendor/MSFT/DMClient/Provider/{ProviderID}/Push/PFN`, with
//!    `<Meta><Format xmlns="syncml:metinf">chr</Format></Meta>` and `Data`
//!    as the last child of `Item`;
//! 2. `Get` of `.../Push/ChannelURI`;
//! 3. `Get` of `.../Push/Status`.
//!
//! Every `CmdID` is unique and never `0`, no `LocURI` starts with `/`, and
//! nothing is wrapped in `Atomic`. Every piece of text is XML-escaped.

use std::fmt::Write as _;

/// Root of the DMClient provider nodes.
pub const DMCLIENT_PROVIDER_ROOT: &str = "./Vendor/MSFT/DMClient/Provider";

/// Which SyncML command sets the PFN node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PfnVerb {
    /// The node was never set on this device.
    Add,
    /// The node exists: overwrite it (the usual case).
    Replace,
}

impl PfnVerb {
    /// The SyncML element name.
    pub fn element(self) -> &'static str {
        match self {
            PfnVerb::Add => "Add",
            PfnVerb::Replace => "Replace",
        }
    }
}

/// Inputs of one PFN replacement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PfnCommand<'a> {
    /// The MDM server's DMClient provider id (`{ProviderID}` in the node path).
    pub provider_id: &'a str,
    /// The package family name the device must register for push.
    pub pfn: &'a str,
    pub verb: PfnVerb,
    /// The first `CmdID` to use, so the fragment fits after the commands the
    /// MDM server already put in the message. `0` is treated as `1`.
    pub first_cmd_id: u32,
}

/// The commands, ready to paste into a `SyncBody`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncmlFragment {
    /// The commands, one per line, no XML declaration, no enclosing element.
    pub xml: String,
    /// The `CmdID` of each command in order: PFN set, ChannelURI get,
    /// Status get. The device's `Status`/`Results` refer to them by `CmdRef`.
    pub cmd_ids: Vec<u32>,
    /// The first `CmdID` free after the fragment.
    pub next_cmd_id: u32,
}

/// Number of commands in the fragment.
const COMMANDS: u32 = 3;

/// Builds the PFN-replacement fragment.
///
/// The two reads are two `Get` commands rather than one `Get` with two
/// `Item`s: the device answers each command with its own `Status`, so a
/// failed read of `ChannelURI` (the node can be absent or empty while WNS
/// registration runs) never hides the `Push/Status` code, and each `Results`
/// maps to exactly one node by `CmdRef` without the MDM server having to
/// match items by `LocURI`.
///
/// `CmdID`s run from `first_cmd_id` (at least 1). A start so close to
/// `u32::MAX` that three ids would not fit is lowered so that every id and
/// `next_cmd_id` stay representable and non-zero.
///
/// The provider id is inserted into the node path as given: callers pass a
/// validated [`ProviderId`](super::ids::ProviderId), which has no `/`. Text
/// is XML-escaped either way, so the output is always well-formed.
pub fn pfn_replacement(cmd: &PfnCommand) -> SyncmlFragment {
    let first = cmd.first_cmd_id.clamp(1, u32::MAX - COMMANDS);
    let ids = [first, first + 1, first + 2];
    let base = format!(
        "{DMCLIENT_PROVIDER_ROOT}/{}/Push",
        escape_xml(cmd.provider_id)
    );
    let verb = cmd.verb.element();
    let mut xml = String::with_capacity(640 + cmd.pfn.len() + 3 * base.len());
    // Writing to a String cannot fail.
    let _ = writeln!(
        xml,
        "<{verb}><CmdID>{}</CmdID><Item><Target><LocURI>{base}/PFN</LocURI></Target>\
         <Meta><Format xmlns=\"syncml:metinf\">chr</Format></Meta>\
         <Data>{}</Data></Item></{verb}>",
        ids[0],
        escape_xml(cmd.pfn)
    );
    for (id, node) in [(ids[1], "ChannelURI"), (ids[2], "Status")] {
        let _ = writeln!(
            xml,
            "<Get><CmdID>{id}</CmdID><Item><Target><LocURI>{base}/{node}</LocURI></Target></Item></Get>"
        );
    }
    SyncmlFragment {
        xml,
        cmd_ids: ids.to_vec(),
        next_cmd_id: first + COMMANDS,
    }
}

/// Escapes the five XML special characters, for text and attribute values.
pub fn escape_xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One command as read back by an XML parser.
    #[derive(Debug, PartialEq)]
    struct Parsed {
        name: String,
        cmd_id: u32,
        /// (LocURI, Format, Data) per Item.
        items: Vec<(String, Option<String>, Option<String>)>,
    }

    fn parse(fragment: &str) -> Vec<Parsed> {
        let wrapped = format!("<SyncBody>{fragment}</SyncBody>");
        let doc = roxmltree::Document::parse(&wrapped).expect("fragment is well-formed XML");
        assert!(
            !doc.descendants().any(|n| n.has_tag_name("Atomic")),
            "no Atomic"
        );
        let mut out = Vec::new();
        for cmd in doc.root_element().children().filter(|n| n.is_element()) {
            let kids: Vec<_> = cmd.children().filter(|n| n.is_element()).collect();
            assert_eq!(kids[0].tag_name().name(), "CmdID", "CmdID comes first");
            let cmd_id = kids[0].text().unwrap().parse().unwrap();
            let mut items = Vec::new();
            for item in kids.iter().filter(|k| k.tag_name().name() == "Item") {
                let parts: Vec<_> = item.children().filter(|n| n.is_element()).collect();
                let names: Vec<_> = parts.iter().map(|p| p.tag_name().name()).collect();
                assert_eq!(names[0], "Target");
                if let Some(pos) = names.iter().position(|n| *n == "Data") {
                    assert_eq!(pos, names.len() - 1, "Data is the last child of Item");
                }
                let loc = parts[0]
                    .children()
                    .find(|n| n.has_tag_name("LocURI"))
                    .and_then(|n| n.text())
                    .unwrap_or("")
                    .to_owned();
                let format = parts
                    .iter()
                    .find(|p| p.has_tag_name("Meta"))
                    .and_then(|m| m.children().find(|n| n.has_tag_name("Format")))
                    .map(|f| {
                        assert_eq!(f.tag_name().namespace(), Some("syncml:metinf"));
                        f.text().unwrap_or("").to_owned()
                    });
                let data = parts
                    .iter()
                    .find(|p| p.has_tag_name("Data"))
                    .map(|d| d.text().unwrap_or("").to_owned());
                items.push((loc, format, data));
            }
            out.push(Parsed {
                name: cmd.tag_name().name().to_owned(),
                cmd_id,
                items,
            });
        }
        out
    }

    fn check(cmd: &PfnCommand) {
        let f = pfn_replacement(cmd);
        let parsed = parse(&f.xml);
        let base = format!("./Vendor/MSFT/DMClient/Provider/{}/Push", cmd.provider_id);
        assert_eq!(parsed.len(), 3);
        assert_eq!(parsed[0].name, cmd.verb.element());
        assert_eq!(
            parsed[0].items,
            vec![(
                format!("{base}/PFN"),
                Some("chr".to_owned()),
                Some(cmd.pfn.to_owned())
            )]
        );
        assert_eq!(parsed[1].name, "Get");
        assert_eq!(
            parsed[1].items,
            vec![(format!("{base}/ChannelURI"), None, None)]
        );
        assert_eq!(parsed[2].name, "Get");
        assert_eq!(
            parsed[2].items,
            vec![(format!("{base}/Status"), None, None)]
        );
        let ids: Vec<u32> = parsed.iter().map(|p| p.cmd_id).collect();
        assert_eq!(ids, f.cmd_ids);
        assert!(ids.iter().all(|&i| i != 0));
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "unique, increasing");
        assert_eq!(f.next_cmd_id, ids[2] + 1);
        assert!(ids[0] >= cmd.first_cmd_id.max(1) || cmd.first_cmd_id > u32::MAX - 3);
        for p in &parsed {
            for (loc, _, _) in &p.items {
                assert!(!loc.starts_with('/'));
            }
        }
    }

    #[test]
    fn replace_then_two_gets() {
        let cmd = PfnCommand {
            provider_id: "Contoso-MDM",
            pfn: "Contoso.MDM_8wekyb3d8bbwe",
            verb: PfnVerb::Replace,
            first_cmd_id: 7,
        };
        check(&cmd);
        let f = pfn_replacement(&cmd);
        assert_eq!(f.cmd_ids, vec![7, 8, 9]);
        assert_eq!(f.next_cmd_id, 10);
        assert!(f.xml.starts_with(
            "<Replace><CmdID>7</CmdID><Item><Target><LocURI>./Vendor/MSFT/DMClient/Provider/Contoso-MDM/Push/PFN</LocURI></Target>"
        ));
        assert!(f
            .xml
            .contains("<Meta><Format xmlns=\"syncml:metinf\">chr</Format></Meta><Data>Contoso.MDM_8wekyb3d8bbwe</Data></Item></Replace>"));
    }

    #[test]
    fn add_verb_and_zero_start() {
        let cmd = PfnCommand {
            provider_id: "p",
            pfn: "A.B_0123456789abc",
            verb: PfnVerb::Add,
            first_cmd_id: 0,
        };
        check(&cmd);
        assert_eq!(pfn_replacement(&cmd).cmd_ids, vec![1, 2, 3]);
    }

    #[test]
    fn ids_near_the_top_stay_non_zero() {
        let cmd = PfnCommand {
            provider_id: "p",
            pfn: "x",
            verb: PfnVerb::Replace,
            first_cmd_id: u32::MAX,
        };
        check(&cmd);
        let f = pfn_replacement(&cmd);
        assert_eq!(f.next_cmd_id, u32::MAX);
    }

    #[test]
    fn escapes_every_special_character() {
        let cmd = PfnCommand {
            provider_id: "a&b<c>d\"e'f",
            pfn: "</Data><Atomic>&amp;'\"",
            verb: PfnVerb::Replace,
            first_cmd_id: 1,
        };
        check(&cmd);
        let f = pfn_replacement(&cmd);
        assert!(f.xml.contains("a&amp;b&lt;c&gt;d&quot;e&apos;f"));
        assert!(f
            .xml
            .contains("&lt;/Data&gt;&lt;Atomic&gt;&amp;amp;&apos;&quot;"));
    }

    proptest! {
        #[test]
        fn any_ids_round_trip(provider in "[^\u{0}-\u{8}\u{b}\u{c}\u{e}-\u{1f}\u{fffe}\u{ffff}\\s]{1,40}",
                              pfn in "[^\u{0}-\u{8}\u{b}\u{c}\u{e}-\u{1f}\u{fffe}\u{ffff}\\s]{0,80}",
                              first in any::<u32>(), add in any::<bool>()) {
            let verb = if add { PfnVerb::Add } else { PfnVerb::Replace };
            check(&PfnCommand { provider_id: &provider, pfn: &pfn, verb, first_cmd_id: first });
        }
    }
}
