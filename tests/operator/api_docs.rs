//! The README's ClusterApp field reference is generated from the CRD's schema
//! descriptions, so it cannot drift from the API. This test fails when the
//! README's block differs from what the CRD says; run it with
//! `CLUSTERAPP_BLESS=1` to rewrite the block.

use serde_json::Value;

use crate::support;

const BEGIN: &str = "<!-- BEGIN GENERATED API REFERENCE (tests/operator/api_docs.rs) -->";
const END: &str = "<!-- END GENERATED API REFERENCE -->";

/// One line of text for a Markdown table cell.
fn cell(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ").replace('|', "\\|")
}

fn type_of(schema: &Value) -> String {
    match schema["type"].as_str() {
        Some("array") => format!("[]{}", type_of(&schema["items"])),
        Some("object") if schema.get("additionalProperties").is_some() && schema.get("properties").is_none() => {
            "map".to_string()
        }
        Some(t) => t.to_string(),
        None if schema.get("x-kubernetes-int-or-string").is_some() => "int-or-string".to_string(),
        None => "object".to_string(),
    }
}

fn default_of(schema: &Value) -> String {
    match &schema["default"] {
        Value::Null => String::new(),
        // whole objects of defaults are listed field by field below them
        Value::Object(_) => String::new(),
        v => format!("`{v}`"),
    }
}

/// Rows for every field under `schema`, depth first, in the schema's order.
fn rows(schema: &Value, path: &str, out: &mut Vec<String>) {
    let Some(props) = schema["properties"].as_object() else { return };
    let required: Vec<&str> =
        schema["required"].as_array().map(|r| r.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    for (name, field) in props {
        let field_path = format!("{path}.{name}");
        let mut description = cell(field["description"].as_str().unwrap_or(""));
        if required.contains(&name.as_str()) {
            description = format!("**Required.** {description}");
        }
        if let Some(allowed) = field["enum"].as_array() {
            let list: Vec<String> = allowed.iter().map(|v| format!("`{}`", v.as_str().unwrap_or_default())).collect();
            description = format!("{description} One of {}.", list.join(", "));
        }
        out.push(format!("| `{field_path}` | {} | {} | {description} |", type_of(field), default_of(field)));
        // Resource requirements are Kubernetes' own type: link rather than expand.
        if name == "resources" {
            continue;
        }
        rows(field, &field_path, out);
        if field["type"] == "array" {
            rows(&field["items"], &format!("{field_path}[]"), out);
        }
    }
}

fn reference() -> String {
    let text =
        std::fs::read_to_string(support::repo_root().join("crds/clusterapp.yaml")).expect("crds/clusterapp.yaml");
    let crd: Value = serde_yaml_ng::from_str(&text).expect("CRD YAML");
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut out = vec![
        BEGIN.to_string(),
        String::new(),
        "| field | type | default | description |".to_string(),
        "|---|---|---|---|".to_string(),
    ];
    let mut body = Vec::new();
    rows(&schema["properties"]["spec"], "spec", &mut body);
    rows(&schema["properties"]["status"], "status", &mut body);
    out.extend(body);
    out.push(String::new());
    out.push(END.to_string());
    out.join("\n")
}

#[test]
fn readme_field_reference_matches_the_crd() {
    let readme_path = support::repo_root().join("README.md");
    let readme = std::fs::read_to_string(&readme_path).expect("README.md");
    let (Some(start), Some(end)) = (readme.find(BEGIN), readme.find(END)) else {
        panic!("README.md lacks the markers {BEGIN} … {END}");
    };
    let current = &readme[start..end + END.len()];
    let wanted = reference();
    if current != wanted && std::env::var_os("CLUSTERAPP_BLESS").is_some() {
        let updated = format!("{}{}{}", &readme[..start], wanted, &readme[end + END.len()..]);
        std::fs::write(&readme_path, updated).expect("write README.md");
        return;
    }
    assert!(
        current == wanted,
        "README.md's API reference is stale: run `CLUSTERAPP_BLESS=1 cargo test --test operator api_docs`"
    );
    // Every field the CRD has is documented with words, not just named.
    for line in wanted.lines().filter(|l| l.starts_with("| `spec")) {
        let description = line.rsplit('|').nth(1).unwrap_or("").trim();
        assert!(!description.is_empty(), "field without a description in the CRD: {line}");
    }
}
